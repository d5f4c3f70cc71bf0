"""CLI commands for supervised directions: extract, select, orthogonalize, export, import."""

from __future__ import annotations

import argparse
import sys

from ._io import refuse_existing
from .errors import SteerscopeError


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """all | A:B (B exclusive) | A,B,C."""
    if spec is None or spec == "all":
        return None
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            return list(range(int(a or 0), int(b) if b else n_layers))
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SteerscopeError(f"cannot parse layers {spec!r}; use all, A:B or A,B,C.") from None


def _model(args):
    from .models.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def _vectors(args, lm):
    from .directions.vectors import VectorSet

    return VectorSet.load(args.vector, lm, check_model=not getattr(args, "allow_other_model", False))


def _pick(vs, index):
    if index is None:
        if len(vs) != 1:
            raise SteerscopeError(f"{len(vs)} vectors in the set; choose one with --index (0..{len(vs) - 1} or an id).")
        return vs[0]
    return vs[int(index) if str(index).lstrip("-").isdigit() else index]


def cmd_extract(args) -> int:
    from .directions.data import load_contrast, load_sets
    from .directions.extract import ExtractConfig, extract, format_stats

    if bool(args.pairs) == bool(args.sets):
        raise SteerscopeError("give either --pairs FILE|NAME or --sets A B.")
    refuse_existing(args.out, args.force)
    data = load_contrast(args.pairs) if args.pairs else load_sets(*args.sets)
    lm = _model(args)
    cfg = ExtractConfig(method=args.method, read=args.read, layers=parse_layers(args.layers, lm.n_layers),
                        chat=False if args.no_chat else None, batch_size=args.batch_size)
    vs = extract(lm, data, cfg)
    print(format_stats(vs))
    vs.save(args.out, overwrite=args.force)
    print(f"saved {len(vs)} candidate vectors to {args.out}", file=sys.stderr)
    return 0


def cmd_select(args) -> int:
    from .directions.data import load_prompts
    from .directions.vectors import VectorSet
    from .judging.selection import SelectConfig, select

    lm = _model(args)
    vs = _vectors(args, lm)
    cfg = SelectConfig(mode=args.mode, coef=args.coef, kl_bound=args.kl_bound, max_layer_frac=args.max_layer_frac,
                       max_new_tokens=args.max_new_tokens, chat=False if args.no_chat else None)
    n = args.n_prompts
    sel = select(lm, vs, args.metric, load_prompts(args.a)[:n], load_prompts(args.b)[:n], load_prompts(args.neutral)[:n], cfg)
    print(sel.table())
    if args.table:
        sel.save(args.table)
    if args.save_best:
        best = sel.best_candidate
        if best is None:
            raise SteerscopeError("no candidate passed the filters, so nothing was saved; loosen --kl-bound or try other layers.")
        i = vs.ids.index(best.id)
        hyper = {**vs.config.hyperparams, "selection": sel.to_dict()}
        VectorSet.create(lm, vs.vectors[i:i + 1], [vs.layers[i]], vs.config.method, ids=[best.id],
                         hyperparams=hyper).save(args.save_best, overwrite=args.force)
        print(f"saved the selected vector {best.id} to {args.save_best}", file=sys.stderr)
    return 0


def cmd_orthogonalize(args) -> int:
    from .interventions.orthogonalize import save_orthogonalized

    lm = _model(args)
    sv = _pick(_vectors(args, lm), args.index)
    save_orthogonalized(lm, sv.vector, args.out, overwrite=args.force)
    print(f"wrote {args.out}: {lm.model_id} with {sv.id} projected out of every residual writer")
    return 0


def cmd_export(args) -> int:
    from .directions.llamacpp import export_gguf
    from .directions.vectors import VectorSet

    vs = VectorSet.load(args.vector)
    idx = None if not args.index else [int(i) if i.lstrip("-").isdigit() else vs.ids.index(i) for i in args.index]
    export_gguf(vs, args.gguf, coef=args.coef, indices=idx, overwrite=args.force)
    layers = [vs.layers[i] for i in (idx if idx is not None else range(len(vs)))]
    print(f"wrote {args.gguf}: direction.{{{','.join(map(str, layers))}}} x {args.coef:g} for {vs.config.model_type}; "
          f"llama.cpp: --control-vector {args.gguf}")
    return 0


def cmd_import(args) -> int:
    from .directions.llamacpp import import_gguf

    lm = _model(args)
    vs = import_gguf(args.gguf, lm, check_model=not args.allow_other_model)
    vs.save(args.out, overwrite=args.force)
    print(f"imported layers {vs.layers} into {args.out}")
    return 0


def add_commands(sub, add_model_args) -> None:
    from .directions.extract import EXTRACTORS

    p = sub.add_parser("extract", help="candidate directions from contrastive data, one per layer",
                       description="Extract one candidate direction per layer (and read position) from contrastive "
                                   "pairs or two prompt sets, with per-layer statistics.")
    p.add_argument("--pairs", help="JSONL/CSV with positive,negative[,prompt] columns, or a builtin: sentiment, formal, french")
    p.add_argument("--sets", nargs=2, metavar=("A", "B"), help="two prompt files (A has the behaviour), or builtins, e.g. harmful harmless")
    p.add_argument("--method", default="diffmean", choices=sorted(EXTRACTORS))
    p.add_argument("--read", default="last", help="last | mean | tail:K (each of the last K tokens)")
    p.add_argument("--layers", default="all", help="all | A:B | A,B,C")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output vector folder")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("select", help="pick the candidate with the best measured effect (refusal-direction style)",
                       description="Score every candidate by adding it on B prompts, ablating it on A prompts and its KL "
                                   "on neutral prompts; filter and pick the best; print the per-layer table.")
    p.add_argument("--vector", required=True, help="candidate vector folder (from extract)")
    p.add_argument("--metric", required=True, help="logodds:I,Sorry | refusal | substring:a|b | regex:P | sentiment")
    p.add_argument("--a", required=True, help="prompts WITH the behaviour (file or builtin: harmful, harmless, neutral)")
    p.add_argument("--b", required=True, help="prompts WITHOUT the behaviour")
    p.add_argument("--neutral", default="neutral", help="neutral prompts for KL (default: builtin neutral)")
    p.add_argument("--n-prompts", type=int, default=32, help="use at most this many prompts of each set")
    p.add_argument("--mode", default="add", choices=["add", "ablate"], help="add: best induce; ablate: lowest bypass (Arditi)")
    p.add_argument("--coef", type=float, default=1.0)
    p.add_argument("--kl-bound", type=float, default=0.1)
    p.add_argument("--max-layer-frac", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=40, help="for text metrics")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--table", help="also write the table as JSON here")
    p.add_argument("--save-best", help="save the selected vector as its own folder")
    p.add_argument("--force", action="store_true")
    p.add_argument("--allow-other-model", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("orthogonalize", help="write a checkpoint with a direction projected out of the weights",
                       description="Weight orthogonalisation: project the direction out of the embeddings and every "
                                   "attention/MLP output matrix; the result equals ablation through hooks.")
    p.add_argument("--vector", required=True)
    p.add_argument("--index", help="which vector of the set (index or id)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--force", action="store_true")
    p.add_argument("--allow-other-model", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_orthogonalize)

    p = sub.add_parser("export", help="write a llama.cpp control vector (GGUF)",
                       description="Write vectors as a llama.cpp control vector: steerscope layer L = direction.L.")
    p.add_argument("--vector", required=True)
    p.add_argument("--gguf", required=True, help="output .gguf file")
    p.add_argument("--index", action="append", help="vector(s) to export (default all; one per layer)")
    p.add_argument("--coef", type=float, default=1.0, help="scale baked into the file")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="read a llama.cpp control vector (GGUF) into a vector folder",
                       description="Read a llama.cpp control vector into a steerscope vector folder for the model.")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--allow-other-model", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_import)
