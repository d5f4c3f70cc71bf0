"""CLI commands for unsupervised discovery: discover, sweep."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from ._io import refuse_existing
from .errors import SteerscopeError


def _layers(spec: str | None) -> tuple[int | None, int | None]:
    if not spec:
        return None, None
    try:
        a, b = spec.split(":", 1)
        return (int(a) if a else None), (int(b) if b else None)
    except ValueError:
        raise SteerscopeError(f"--layers takes SOURCE:TARGET (e.g. 7:22), got {spec!r}.") from None


def cmd_discover(args) -> int:
    from .directions.data import load_prompts
    from .directions.discovery import DiscoverConfig, discover
    from .models.loading import load_model

    out = Path(args.out)
    refuse_existing(out, args.force)
    prompts = load_prompts(args.prompts)[: args.n_prompts]
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    s, t = _layers(args.layers)
    cfg = DiscoverConfig(method=args.method, source=s, target=t, n_vectors=args.vectors, R=args.R,
                         calibrate_ratio=args.calibrate_ratio, target_tokens=args.target_tokens, p=args.p, q=args.q,
                         steps=args.steps, lr=args.lr, orthogonal=not args.no_orthogonal,
                         vectors_per_batch=args.vectors_per_batch, seed=args.seed, chat=False if args.no_chat else None)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".partial")
    if args.force and ckpt.exists():
        shutil.rmtree(ckpt)
    t0 = time.perf_counter()
    vs = discover(lm, prompts, cfg, checkpoint_dir=ckpt if args.method == "melbo" else None)
    elapsed = time.perf_counter() - t0
    vs.save(out, overwrite=args.force)
    shutil.rmtree(ckpt, ignore_errors=True)
    h = vs.config.hyperparams
    cal = h.get("calibration")
    print(f"{args.method}: {len(vs)} vectors at layer {h['source']} (target {h['target']}), R = {h['R']:.4g}"
          + (f" (calibrated: nonlinearity ratio {cal['ratio']})" if cal else "") + f", {len(prompts)} prompts, {elapsed:.1f} s")
    if "final_objective" in h:
        fo = h["final_objective"]
        print(f"final objective per vector: min {min(fo):.4g}, median {sorted(fo)[len(fo) // 2]:.4g}, max {max(fo):.4g}")
    if "singular_values" in h:
        print(f"singular values: {', '.join(f'{x:.4g}' for x in h['singular_values'])}; "
              f"{'converged' if h['converged'] else 'NOT converged'} after {h['iterations']} iterations")
    print(f"saved to {out}")
    return 0


def cmd_sweep(args) -> int:
    from .directions.data import load_prompts
    from .directions.discovery.sweep import format_sweep, norm_sweep
    from .directions.vectors import VectorSet
    from .models.loading import load_model

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    vs = VectorSet.load(args.vector, lm, check_model=not args.allow_other_model)
    if args.index:
        idx = [int(i) for i in args.index]
        vs = VectorSet.create(lm, vs.vectors[idx], [vs.layers[i] for i in idx], vs.config.method,
                              ids=[vs.ids[i] for i in idx], hyperparams=vs.config.hyperparams)
    multiples = [float(x) for x in args.multiples.split(",")]
    rows = norm_sweep(lm, load_prompts(args.prompts)[: args.n_prompts], vs, multiples, max_new_tokens=args.max_new_tokens,
                      chat=False if args.no_chat else None)
    print(format_sweep(rows))
    return 0


def cmd_run(args) -> int:
    from .directions.discovery import DiscoverConfig
    from .run import RunConfig, run

    s, t = _layers(args.layers)
    out = args.out or f"runs/{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = RunConfig(model=args.model, dtype=args.dtype, prompts=args.prompts, n_train=args.n_train, n_heldout=args.n_heldout,
                    discover=DiscoverConfig(method=args.method, source=s, target=t, n_vectors=args.vectors,
                                            R=args.R or None, steps=args.steps, seed=args.seed),
                    max_new_tokens=args.max_new_tokens, scorers=[x for x in args.scorers.split(",") if x],
                    judge_url=args.judge_url, judge_model=args.judge_model, judge_key_env=args.judge_key_env,
                    judge_rubric=args.judge_rubric,
                    chat=False if args.no_chat else None)
    report = run(cfg, out, force=args.force)
    print(f"report: {report.resolve()}")
    return 0


def add_commands(sub, add_model_args) -> None:
    from .directions.discovery import DISCOVERY

    p = sub.add_parser("discover", help="find steering vectors without naming a behaviour (MELBO, Jacobian, PCA, random)",
                       description="Unsupervised discovery: learn or compute K vectors of norm R at a source layer that "
                                   "change the target layer most (MELBO, Jacobian singular vectors), or baselines.")
    p.add_argument("--method", default="melbo", choices=sorted(DISCOVERY))
    p.add_argument("--prompts", required=True, help="prompt file (one per line) or builtin set (neutral, harmful, harmless)")
    p.add_argument("--n-prompts", type=int, default=8, help="use at most this many prompts")
    p.add_argument("--layers", help="SOURCE:TARGET (default: n_layers/4 : n_layers-8)")
    p.add_argument("--vectors", type=int, default=16, help="number of vectors K")
    p.add_argument("--R", type=float, help="vector norm (default: calibrated from the model)")
    p.add_argument("--calibrate-ratio", type=float, default=0.5, help="nonlinearity ratio that defines the calibrated R")
    p.add_argument("--target-tokens", default="last:3", help="last:K (default last:3) | all")
    p.add_argument("--p", type=float, default=2.0)
    p.add_argument("--q", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, help="Adam learning rate (default 0.01 * R / sqrt(d_model))")
    p.add_argument("--no-orthogonal", action="store_true", help="do not keep the vectors mutually orthogonal")
    p.add_argument("--vectors-per-batch", type=int, help="train this many vectors at once (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--checkpoint", help="checkpoint folder (default OUT.partial); a rerun resumes from it")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite --out and discard an old checkpoint")
    add_model_args(p)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("run", help="the main job: discover, generate, judge, cluster, write an HTML report",
                       description="Discover vectors, generate under them, under matched-norm random controls and "
                                   "unsteered on training and held-out prompts, measure, cluster, and write report.html. "
                                   "Rerun with the same --out to resume.")
    p.add_argument("--out", help="run folder (default runs/METHOD-TIMESTAMP); an existing run with the same settings resumes")
    p.add_argument("--prompts", default="neutral", help="prompt file or builtin set")
    p.add_argument("--n-train", type=int, default=2)
    p.add_argument("--n-heldout", type=int, default=2)
    p.add_argument("--method", default="melbo", choices=sorted(DISCOVERY))
    p.add_argument("--vectors", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--R", type=float, default=4.0, help="vector norm (0: calibrate from the model)")
    p.add_argument("--layers", help="SOURCE:TARGET")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--scorers", default="refusal,sentiment", help="comma-separated: refusal, sentiment, regex:P, substring:a|b")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (optional)")
    p.add_argument("--judge-model", help="model name for the judge")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")
    p.add_argument("--judge-rubric", help="rubric (system prompt) asking for a number; default: how far the response departs")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--force", action="store_true", help="replace an existing run with different settings")
    add_model_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="norm sweep: target-layer and completion change as R is scaled",
                       description="Scale the vectors by several multiples of R and report the target-layer change, the "
                                   "share of completions that change, and the number of distinct completions.")
    p.add_argument("--vector", required=True)
    p.add_argument("--index", action="append", help="vector(s) to sweep (default all)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--multiples", default="0.25,0.5,1,2,4")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--allow-other-model", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_sweep)
