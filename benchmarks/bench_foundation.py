"""Foundation benchmarks on the embedded SmolLM2-135M-Instruct. Every number is a ratio of two
timings taken in this one run (the machines are noisy), interleaved and best-of-N.

    python benchmarks/bench_foundation.py [--reps 3] [--skip-load]

1. steering overhead: greedy 64 tokens x 16 prompts, per-row vectors at one layer vs unsteered
   (same batch)                                                              target <= 5 %
2. 16 vectors x 4 prompts in one batched call vs a loop over the vectors     target >= 4x
3. cached default-model load vs first load (dequantise + cache)              target < 2 s
plus the same generation in bfloat16 vs float32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import steerscope as ss

PROMPTS = [
    "Tell me about your weekend.",
    "Describe the city you live in.",
    "What is your favourite food?",
    "Write a short poem about rain.",
    "How do I learn to play the guitar?",
    "Explain photosynthesis simply.",
    "What makes a good friend?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "Describe a walk in the forest.",
    "What is the capital of France?",
    "Suggest a name for a cat.",
    "How do airplanes fly?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a beach trip?",
    "Summarise the plot of Cinderella.",
]


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    out = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k] = min(out[k], time.perf_counter() - t)
    return out


def bench_overhead(lm, reps: int, tokens: int = 64) -> None:
    enc = lm.encode(PROMPTS, chat=True)
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(len(PROMPTS), lm.d_model, generator=g)  # one vector per row
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)

    def plain():
        with torch.no_grad():
            lm.model.generate(**enc, **kw)

    def steered():
        with torch.no_grad(), ss.steer(lm, ss.Add(vecs, layer=lm.n_layers // 2, coef=1.0)):
            lm.model.generate(**enc, **kw)

    plain()  # warm-up
    t = interleaved({"unsteered": plain, "steered": steered}, reps)
    print(
        f"[{str(lm.dtype)[6:]}] 16 prompts x {tokens} tokens: unsteered {t['unsteered']:.2f} s, per-row steered "
        f"{t['steered']:.2f} s -> overhead {100 * (t['steered'] / t['unsteered'] - 1):+.1f} % (target <= 5 %)"
    )
    return t["unsteered"]


def bench_batched(lm, reps: int, tokens: int = 32) -> None:
    prompts = PROMPTS[:4]
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(16, lm.d_model, generator=g) * 2
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, include_unsteered=False, progress=False)

    def batched():
        ss.generate(lm, prompts, vectors=vecs, layer=8, batch_size=64, **kw)

    def looped():
        for i in range(len(vecs)):
            ss.generate(lm, prompts, vectors=vecs[i], layer=8, **kw)

    batched()
    t = interleaved({"batched": batched, "loop": looped}, reps)
    print(
        f"16 vectors x 4 prompts x {tokens} tokens: one batched call {t['batched']:.2f} s, loop over vectors "
        f"{t['loop']:.2f} s -> {t['loop'] / t['batched']:.1f}x faster (target >= 4x)"
    )


def bench_load() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("STEERSCOPE_CACHE")
        os.environ["STEERSCOPE_CACHE"] = tmp
        try:
            t = time.perf_counter()
            ss.load_model()
            first = time.perf_counter() - t
            cached = best(lambda: ss.load_model(), 3)
        finally:
            if old is None:
                os.environ.pop("STEERSCOPE_CACHE")
            else:
                os.environ["STEERSCOPE_CACHE"] = old
    print(
        f"default model load: first (dequantise + cache) {first:.1f} s, cached {cached:.2f} s "
        f"-> {first / cached:.0f}x faster (target < 2 s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_load:
        bench_load()
    lm = ss.load_model()
    fp32 = bench_overhead(lm, args.reps)
    bench_batched(lm, args.reps)
    lm16 = ss.load_model(dtype="bfloat16")
    bf16 = bench_overhead(lm16, args.reps)
    print(f"bfloat16 vs float32 unsteered generation: {fp32 / bf16:.2f}x faster")


if __name__ == "__main__":
    main()
