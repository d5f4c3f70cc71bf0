"""CLI: steerscope sae train | eval | features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._io import refuse_existing, write_text_atomic
from .errors import SteerscopeError


def load_texts(spec: str, lm=None, seed: int = 0) -> list[str]:
    """A .txt file (one document per blank-line-separated paragraph), a .jsonl file with a `text`
    field, or self:N — N completions the model samples itself from the builtin neutral prompts."""
    if spec.startswith("self:"):
        from .directions.data import load_prompts
        from .generation import generate

        n = int(spec[5:])
        prompts = (load_prompts("neutral") * (n // 40 + 1))[:n]
        return [r.prompt + " " + r.text for r in generate(lm, prompts, max_new_tokens=96, temperature=1.0, seed=seed)]
    path = Path(spec)
    if not path.is_file():
        raise SteerscopeError(f"text source {spec!r} is neither a file nor self:N.")
    if path.suffix == ".jsonl":
        texts = [json.loads(l)["text"] for l in path.read_text().splitlines() if l.strip()]
    else:
        texts = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    if not texts:
        raise SteerscopeError(f"{path} holds no text.")
    return texts


def cmd_sae_train(args) -> int:
    import shutil

    from ._io import write_json_atomic
    from .models.loading import load_model
    from .sae import ActivationBuffer, SAEConfig, TrainConfig, cache_activations, load_checkpoint, shard_batches, train_sae
    from .sae.formats import save_saelens

    out = Path(args.out)
    refuse_existing(out, args.force)
    partial = out.with_name(out.name + ".partial")  # checkpoints while training; removed when the SAE is saved
    if partial.exists() and args.force:
        shutil.rmtree(partial)
    ckpt = load_checkpoint(partial)
    if ckpt is not None:
        print(f"resuming from the checkpoint at step {ckpt['step']} in {partial} (pass --force to start over)", file=sys.stderr)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    layer = lm.check_layer(args.layer)
    cache = Path(args.cache) if args.cache else None
    if cache is None:
        source = ActivationBuffer(lm, load_texts(args.text, lm, args.seed), layer, batch_size=args.batch_size,
                                  buffer_tokens=args.buffer, seed=args.seed)
    else:
        if any(cache.glob("acts-*.safetensors")):
            print(f"training on the activations cached in {cache} (the --text source is not read)", file=sys.stderr)
        else:
            n = cache_activations(ActivationBuffer(lm, load_texts(args.text, lm, args.seed), layer, seed=args.seed), cache)
            print(f"cached {n} activations at layer {layer} in {cache}", file=sys.stderr)
        source = shard_batches(cache, args.batch_size, seed=args.seed)
    cfg = SAEConfig(lm.d_model, args.latents, arch=args.arch, k=args.k, l1_coef=args.l1, model_id=lm.model_id,
                    model_type=lm.model_type, layer=layer)
    tcfg = TrainConfig(steps=args.steps, seed=args.seed)
    sae, hist = train_sae(source, cfg, tcfg, progress=sys.stderr.isatty(), checkpoint_dir=partial,
                          checkpoint_every=args.checkpoint_every)
    save_saelens(sae, out, overwrite=args.force)
    write_json_atomic(out / "training.json", {"steps": args.steps, "batch_size": args.batch_size, "input_scale": hist.input_scale,
                                              "l0": hist.l0, "fvu": hist.fvu, "dead_frac": hist.dead_frac})
    shutil.rmtree(partial, ignore_errors=True)
    print(f"{args.arch} SAE, {args.latents} latents at layer {layer}: L0 {hist.l0[-1]:.1f}, FVU {hist.fvu[-1]:.3f}, "
          f"dead {hist.dead_frac[-1]:.1%} after {args.steps} steps x {args.batch_size} tokens; saved to {out}")
    return 0


def cmd_sae_corpus(args) -> int:
    from .models.loading import load_model
    from .sae.corpus import sample_corpus

    out = Path(args.out)
    if out.exists():
        if args.force:
            out.unlink()
        else:
            print(f"{out} exists: continuing it (finished batches are kept; --force starts over)", file=sys.stderr)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    n = sample_corpus(lm, out, args.docs, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, progress=sys.stderr.isatty())
    print(f"{out}: {n} documents sampled from {lm.model_id}")
    return 0


def cmd_sae_eval(args) -> int:
    from .models.loading import load_model
    from .sae.evaluate import baseline_dictionary, evaluate, sae_codec
    from .sae.formats import load_saelens
    from .sae.train import ActivationBuffer

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    sae = load_saelens(args.sae)
    if sae.cfg.d_in != lm.d_model:
        raise SteerscopeError(f"the SAE reads {sae.cfg.d_in}-dim activations but the model's d_model is {lm.d_model}.")
    texts = load_texts(args.text, lm, args.seed + 1)
    layer = sae.cfg.layer
    rows = {"sae": evaluate(lm, sae_codec(sae), texts, layer, n_latents=sae.cfg.n_latents)}
    if args.baselines:
        fit = next(iter(ActivationBuffer(lm, texts, layer, batch_size=4096, buffer_tokens=4096, loop=True)))
        k = max(1, round(rows["sae"].l0))
        for kind in ("pca", "ica", "random"):
            rows[f"{kind} (k={k})"] = evaluate(lm, baseline_dictionary(kind, fit, k), texts, layer)
    print(f"{'':>16} {'L0':>7} {'FVU':>7} {'CE rec.':>8} {'KL':>7} {'dead':>6}")
    for name, e in rows.items():
        print(f"{name:>16} {e.l0:7.1f} {e.fvu:7.3f} {e.ce_recovered:8.3f} {e.kl_spliced:7.3f} {e.dead_frac:6.1%}")
    print(f"clean CE {rows['sae'].ce_clean:.3f}, zero-ablated {rows['sae'].ce_zero:.3f}; {rows['sae'].n_tokens} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v.to_dict() for k, v in rows.items()}, indent=2))
    return 0


def cmd_sae_features(args) -> int:
    from .models.loading import load_model
    from .sae.features import render_features_page, top_contexts
    from .sae.formats import load_saelens

    out = Path(args.out)
    refuse_existing(out, args.force)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    sae = load_saelens(args.sae)
    feats = [int(x) for x in args.features.split(",")] if args.features else None
    if feats and any(not 0 <= f < sae.cfg.n_latents for f in feats):
        raise SteerscopeError(f"features must be in 0..{sae.cfg.n_latents - 1}.")
    ctx, freq = top_contexts(lm, sae, load_texts(args.text, lm, args.seed), feats, n_top=args.n_top, window=args.window)
    html = render_features_page(ctx, freq, f"SAE features — {sae.cfg.arch}, {sae.cfg.n_latents} latents, layer {sae.cfg.layer}")
    write_text_atomic(out, html)
    print(f"wrote {out}: {len(ctx)} features")
    return 0


def add_commands(sub, add_model_args) -> None:
    sae = sub.add_parser("sae", help="sparse autoencoders: train, eval, features, corpus", description="Sparse autoencoders on the residual stream.")
    ssub = sae.add_subparsers(dest="sae_command", metavar="SAE_COMMAND")
    ssub.required = True
    p = ssub.add_parser("train", help="train an SAE at one layer", description="Train a TopK, BatchTopK or ReLU SAE on "
                        "residual activations streamed from the model; saved in the SAELens layout.")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--text", default="self:200", help=".txt / .jsonl file, or self:N (text the model samples itself)")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "relu"])
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (relu)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--buffer", type=int, default=32768, help="activation buffer size in tokens")
    p.add_argument("--cache", help="activation cache folder: filled from --text on first use, then trained from "
                                   "(safetensors shards), so repeated runs skip the model")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (in OUT.partial/); "
                   "a rerun with the same settings resumes from the last one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite OUT and discard any checkpoint")
    add_model_args(p)
    p.set_defaults(func=cmd_sae_train)
    p = ssub.add_parser("corpus", help="sample a JSONL text corpus from the model itself (for training SAEs offline)",
                        description="Sample documents from the model (chat answers to topic x task requests and "
                                    "continuations of prose openings) into a JSONL file; resumable.")
    p.add_argument("--docs", type=int, default=640)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--force", action="store_true", help="start the file over")
    add_model_args(p)
    p.set_defaults(func=cmd_sae_corpus)
    p = ssub.add_parser("eval", help="L0, FVU, CE recovered, KL, dead latents (+ baselines)",
                        description="Evaluate an SAE on text: L0, FVU, CE loss recovered, spliced KL, dead share; "
                                    "optionally PCA/ICA/random baselines at the same sparsity.")
    p.add_argument("--sae", required=True, help="SAE folder (SAELens layout)")
    p.add_argument("--text", default="self:40")
    p.add_argument("--baselines", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers here")
    add_model_args(p)
    p.set_defaults(func=cmd_sae_eval)
    p = ssub.add_parser("features", help="HTML page of each feature's top-activating contexts",
                        description="Write an HTML page with the top-activating contexts of chosen features (default: the "
                                    "most frequently firing) and the feature-density histogram.")
    p.add_argument("--sae", required=True)
    p.add_argument("--text", default="self:40")
    p.add_argument("--features", help="comma-separated feature indices (default: the 24 most frequent)")
    p.add_argument("--n-top", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .html file")
    p.add_argument("--force", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_sae_features)
