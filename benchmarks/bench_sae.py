"""SAE throughput and quality on SmolLM2-135M-Instruct activations; one run.

    python benchmarks/bench_sae.py [--docs 3200] [--tokens 3000000] [--layer 12] [--latents 4096] [--k 32]
                                   [--work runs/bench_sae] [--relu-l1 1,3,10]

Steps (each resumable; rerun the same command after an interruption):
1. corpus: `--docs` documents the model samples itself (`sae corpus`), JSONL in WORK/corpus.jsonl;
   the last `--held-out` documents are kept for evaluation only.
2. activations at `--layer` of the training documents, cached once as safetensors shards in
   WORK/acts (reports the model's activation throughput, tokens/s).
3. a TopK SAE (`--latents`, `--k`) trained for `--tokens` tokens from the shuffled shards, with
   checkpoints in WORK/sae.partial (reports SAE training throughput, tokens/s).
4. held-out L0 / FVU / CE loss recovered / spliced KL / dead share of the SAE against PCA, ICA and
   random dictionaries at the same sparsity (top-k coefficients), fitted on the same activations.
5. optionally (`--relu-l1`), short ReLU+L1 runs at several coefficients, to see which L1 gives
   which L0 on this model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import steerscope as ss
from steerscope.sae import ActivationBuffer, SAEConfig, TrainConfig, cache_activations, shard_batches, train_sae
from steerscope.sae.corpus import CorpusConfig, sample_corpus
from steerscope.sae.evaluate import baseline_dictionary, evaluate, sae_codec
from steerscope.sae.formats import load_saelens, save_saelens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3200, help="self-sampled documents in the corpus")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=3_000_000, help="SAE training tokens")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", help="model dtype for activations and evaluation")
    ap.add_argument("--sample-dtype", default="bfloat16", help="model dtype for sampling the corpus")
    ap.add_argument("--relu-l1", default="", help="comma-separated L1 coefficients for short ReLU runs")
    ap.add_argument("--work", default="runs/bench_sae")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    corpus = work / "corpus.jsonl"
    have = sum(1 for _ in corpus.open()) if corpus.exists() else 0
    if have < args.docs:
        sampler = ss.load_model(dtype=args.sample_dtype)
        t0 = time.perf_counter()
        sample_corpus(sampler, corpus, CorpusConfig(docs=args.docs), progress=True)
        el = time.perf_counter() - t0
        print(f"sampled {args.docs - have} documents in {el:.0f} s ({args.sample_dtype})")
        del sampler
    docs = [json.loads(line)["text"] for line in corpus.open()][: args.docs]
    train_docs, held = docs[: -args.held_out], docs[-args.held_out :]

    lm = ss.load_model(dtype=args.dtype)
    n_tok = sum(len(ids) for ids in lm.tokenizer(train_docs)["input_ids"])
    print(
        f"corpus: {len(docs)} documents, {n_tok:,} training tokens ({len(train_docs)} documents), {len(held)} held out"
    )
    acts = work / f"acts-layer{args.layer}"
    if not any(acts.glob("acts-*.safetensors")):
        t0 = time.perf_counter()
        n = cache_activations(ActivationBuffer(lm, train_docs, args.layer, lm_batch=16), acts)
        el = time.perf_counter() - t0
        print(
            f"cached {n:,} activations at layer {args.layer} in {el:.0f} s = {n / el:,.0f} tokens/s ({args.dtype}; "
            f"the forward stops at layer {args.layer})"
        )
    from safetensors import safe_open

    n_acts = 0
    for f in acts.glob("acts-*.safetensors"):
        with safe_open(str(f), "pt") as h:
            n_acts += h.get_slice("acts").get_shape()[0]
    print(f"{n_acts:,} distinct training activations (first token of each window and outliers dropped)")

    steps = max(1, args.tokens // args.batch)
    out = work / f"topk-{args.latents}-k{args.k}-layer{args.layer}"
    if (out / "cfg.json").exists():
        sae = load_saelens(out)
        print(f"loaded the trained SAE from {out}")
    else:
        cfg = SAEConfig(
            lm.d_model, args.latents, k=args.k, model_id=lm.model_id, model_type=lm.model_type, layer=args.layer
        )
        t0 = time.perf_counter()
        sae, hist = train_sae(
            shard_batches(acts, args.batch),
            cfg,
            TrainConfig(steps=steps),
            progress=True,
            checkpoint_dir=out.with_name(out.name + ".partial"),
            checkpoint_every=200,
        )
        el = time.perf_counter() - t0
        save_saelens(sae, out)
        print(
            f"TopK SAE {args.latents} latents, k={args.k}: {steps} steps x {args.batch} = {steps * args.batch:,} tokens "
            f"({steps * args.batch / n_acts:.1f} passes over the activations) in {el:.0f} s = "
            f"{steps * args.batch / el:,.0f} tokens/s (includes any resumed part only from its restart); "
            f"final training FVU {hist.fvu[-1]:.3f}, dead {hist.dead_frac[-1]:.1%}"
        )

    rows = {"sae": evaluate(lm, sae_codec(sae), held, args.layer, n_latents=args.latents)}
    fit = next(iter(shard_batches(acts, 16384, seed=1)))
    for kind in ("pca", "ica", "random"):
        rows[f"{kind} (k={args.k})"] = evaluate(lm, baseline_dictionary(kind, fit, args.k), held, args.layer)
    for l1 in [float(x) for x in args.relu_l1.split(",") if x]:
        cfg = SAEConfig(lm.d_model, args.latents, arch="relu", l1_coef=l1, layer=args.layer)
        relu, _ = train_sae(shard_batches(acts, args.batch), cfg, TrainConfig(steps=min(steps, 500)), progress=True)
        rows[f"relu l1={l1:g} ({min(steps, 500) * args.batch // 1000}k tok)"] = evaluate(
            lm, sae_codec(relu), held, args.layer, n_latents=args.latents
        )
    e0 = rows["sae"]
    print(
        f"held-out: {e0.n_tokens} tokens of {len(held)} documents; clean CE {e0.ce_clean:.3f}, "
        f"zero-ablated {e0.ce_zero:.3f}"
    )
    print(f"{'':>26} {'L0':>7} {'FVU':>7} {'CE rec.':>8} {'KL':>7} {'dead':>6}")
    for name, e in rows.items():
        print(f"{name:>26} {e.l0:7.1f} {e.fvu:7.3f} {e.ce_recovered:8.3f} {e.kl_spliced:7.3f} {e.dead_frac:6.1%}")
    (work / "results.json").write_text(json.dumps({k: v.to_dict() for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
