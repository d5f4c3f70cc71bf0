"""SAE throughput and quality on SmolLM2-135M-Instruct activations; one run.

    python benchmarks/bench_sae.py [--layer 12] [--latents 4096] [--k 32] [--tokens 500000] [--dtype float32]

Reports: activation throughput of the model (tokens/s into the buffer), SAE training throughput
(tokens/s of optimisation steps on those activations), and L0 / FVU / CE recovered / KL of the
trained SAE against PCA, ICA and random dictionaries at the same sparsity, on held-out text the
model samples itself. The issue's target run is "a few million tokens"; pass --tokens 3000000.
"""

from __future__ import annotations

import argparse
import time

import torch

import steerscope as ss
from steerscope.cli_sae import load_texts
from steerscope.sae import ActivationBuffer, SAEConfig, TrainConfig, tensor_batches, train_sae
from steerscope.sae.evaluate import baseline_dictionary, evaluate, sae_codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=500_000, help="training tokens")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--texts", type=int, default=120, help="self-sampled training documents (activations are reused)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    lm = ss.load_model(dtype=args.dtype)
    t0 = time.perf_counter()
    texts = load_texts(f"self:{args.texts}", lm, seed=0)
    t_sample = time.perf_counter() - t0
    buf = ActivationBuffer(lm, texts, args.layer, batch_size=args.batch, buffer_tokens=10**9, loop=False)
    t0 = time.perf_counter()
    buf._fill()
    acts = buf.buf
    t_acts = time.perf_counter() - t0
    print(f"{len(texts)} self-sampled documents in {t_sample:.0f} s; {len(acts)} activations at layer {args.layer} in "
          f"{t_acts:.1f} s = {len(acts) / t_acts:,.0f} tokens/s ({args.dtype})")
    steps = max(1, args.tokens // args.batch)
    t0 = time.perf_counter()
    sae, hist = train_sae(tensor_batches(acts, args.batch), SAEConfig(lm.d_model, args.latents, k=args.k, layer=args.layer),
                          TrainConfig(steps=steps, warmup_steps=min(100, steps // 10)))
    t_train = time.perf_counter() - t0
    print(f"TopK SAE {args.latents} latents, k={args.k}: {steps} steps x {args.batch} = {steps * args.batch:,} tokens in "
          f"{t_train:.0f} s = {steps * args.batch / t_train:,.0f} tokens/s; final training FVU {hist.fvu[-1]:.3f}, "
          f"dead {hist.dead_frac[-1]:.1%}")
    held = load_texts("self:30", lm, seed=1)
    rows = {"sae": evaluate(lm, sae_codec(sae), held, args.layer, n_latents=args.latents)}
    fit = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))[:8192]]
    for kind in ("pca", "ica", "random"):
        rows[f"{kind} (k={args.k})"] = evaluate(lm, baseline_dictionary(kind, fit, args.k), held, args.layer)
    print(f"held-out ({rows['sae'].n_tokens} tokens; clean CE {rows['sae'].ce_clean:.3f}, zero-ablated {rows['sae'].ce_zero:.3f}):")
    print(f"{'':>14} {'L0':>6} {'FVU':>7} {'CE rec.':>8} {'KL':>7} {'dead':>6}")
    for name, e in rows.items():
        print(f"{name:>14} {e.l0:6.1f} {e.fvu:7.3f} {e.ce_recovered:8.3f} {e.kl_spliced:7.3f} {e.dead_frac:6.1%}")


if __name__ == "__main__":
    main()
